"""Multi-step jobs (pretrain, retrain, robust active learning): thin, resumable loops over the library."""
