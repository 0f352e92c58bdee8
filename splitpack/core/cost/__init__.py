"""Cost: exact MAC/op counts (counts), fast per-grid estimates for the search (fast_estimate), the exact peak replay (exact_peak), PlanCost (plan_cost), the one byte tracker (bytes)."""
