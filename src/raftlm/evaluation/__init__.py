"""Record: held-out metrics of the policy after each stage (and the metric definitions)."""
