"""Context parallelism on torch.distributed, planned from the pattern (issue 19): each rank
fetches only the keys its queries can see. docs/distributed.md."""

from attncc.distributed.attention import attention
from attncc.distributed.nn import ContextParallelAttention
from attncc.distributed.plan import Plan, RankPlan, Slices, balanced_sharding, choose_sharding, plan
from attncc.distributed.sharding import Sharding

__all__ = [
    "ContextParallelAttention",
    "Plan",
    "RankPlan",
    "Sharding",
    "Slices",
    "attention",
    "balanced_sharding",
    "choose_sharding",
    "plan",
]
