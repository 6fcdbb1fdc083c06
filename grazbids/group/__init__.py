"""The group level: the cohort (``cohort``), cross-validated training of every mode
(``training``), out-of-fold maps (``oof_maps``), the ``group/mode-<mode>/`` layout that
writers and the report share (``layout``) and the torchrun entry point (``torchrun``)."""
