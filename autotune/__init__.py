"""Autotuning: candidate plans, cost model, timing and tuning records. Lands with the autotuner."""
