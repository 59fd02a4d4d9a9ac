"""The benchmark suite: attncc against dense SDPA, FlexAttention and naive attention.

``attncc bench`` runs it (see :mod:`attncc.bench.command`): cases are data
(:mod:`.suite`), peers say why they decline (:mod:`.peers`), every peer's output
is checked against ours before it is timed (:mod:`.runner`), and the figures
become a table, JSON, Markdown and a plot (:mod:`.report`).
"""
