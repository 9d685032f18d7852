"""The dry run behind `plan explain`: a real Program applied on a fake process group.

Owns, one phase per module: the fake world and the measured rank's mesh (`world`);
reducing a Program to one decoder block per kind (`reduction`); applying it with the
runtime's own `apply` to a meta-device model as the ranks of each class (`shards`);
one training step traced on fake tensors (`trace`); where a model that fails in the
dry run failed (`failure`); counting and deriving the collectives a step issues
(`comm`); per-rank memory (`memory`); the findings as coded diagnostics on plan lines
(`diagnostics`); byte sizes (`sizes`); and the Explanation the CLI renders (`report`).
`dryrun` is the whole-Program dry run as one rank (the soundness tests use it).

May import: torch, `meshplan.dsl.errors`, `meshplan.planner`, `runtime.parallel`,
`runtime.attention`, `runtime.train.loss`. Nothing here renders to a terminal: that is
`meshplan.cli`.
"""
