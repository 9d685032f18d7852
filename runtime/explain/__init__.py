"""The dry run behind `plan explain`: a real Program applied on a fake process group.

Owns: reducing a Program to one block per kind and applying it with the runtime's own
`apply` to a meta-device model on a fake process group (`dryrun`), counting and deriving
the collectives a step issues (`comm`), per-rank memory (`memory`), and the Explanation
the CLI renders (`report`).

May import: torch, `meshplan.planner`, `runtime.parallel`, `runtime.attention`,
`runtime.train.loss`. Nothing here renders to a terminal: that is `meshplan.cli`.
"""
