"""Training: the LightningModule (``module``), ``run.train(cfg)``, reloading a run (``checkpoint``).

Import the submodules directly; this package stays import-light so ``leaflens.train.checkpoint`` does not pull
in the data stack.
"""
