"""The job side of the stage contract: the one command line (:mod:`.cli`), the stage context a stage's
``run(ctx)`` receives (:mod:`.context`) and the one submitit launcher (:mod:`.launcher`)."""
