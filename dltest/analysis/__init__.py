"""Analyses of selections and runs: selection bias (JSD), comparisons between functions, intervals."""
