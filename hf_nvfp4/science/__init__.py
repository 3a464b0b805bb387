"""Science: measurements of the recipe (diagnose, statistics, ablations, plots), above the integrations."""
