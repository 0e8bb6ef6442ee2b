"""Leaves of the package: small shared values (budgets, ratio, file and column names), the generic registry behind
every extension point, and the value checks the configurations share. Nothing here imports the rest of hf_clipsel."""
