"""The nnU-Net bridge: everything lrcseg does with nnU-Net v2 (the ``lrcseg[nnunet]`` extra).

One concept per module:

    plans.py        nnUNetPlans.json + dataset.json -> NnUNetNetworkConfig
                    (``network_from_plans``); a pre-training set to the plans' network,
                    spacing, patch and CTNormalization (``apply_plans``)
    network.py      the plans' network, built by nnU-Net's get_network_from_plans
                    (``build_nnunet``); lrcseg's window channel -> CTNormalization
                    (``NnUNetInput``); whether weights load into it (``check_loads_into``)
    export.py       ``lrcseg export --format nnunet``: {"network_weights": ...} + its JSON
    workspace.py    an nnU-Net work folder (raw / preprocessed), the environment and the
                    child processes nnU-Net runs in; the one configuration used ("2d")
    planning.py     nnU-Net's planning and preprocessing of a raw dataset
    training.py     nnU-Net's trainer on K labelled cases, optionally from an export
    prediction.py   nnU-Net's predictor on raw images; scoring its label files with
                    lrcseg's metrics
    __main__.py     the child-process entry (``python -m lrcseg.nnunet plan|train|predict``)

The levels adapter that ``PretrainNetwork`` reaches the plans' network through
(``NnUNetLevels``) sits in ``models/pretrain_net.py`` beside the FlexibleUNet one. How an
experiment fine-tunes through nnU-Net (``finetune_with: nnunet``) is
``lrcseg.experiment.backends.NnUNetBackend``, the one place the experiment meets this package.

Layering (``tests/test_layering.py``): this package may import ``models/``, ``data/``,
``evaluate/`` and the top-level modules, never ``train/`` or ``experiment/``. It is imported
by ``experiment/backends.py`` and the commands that take plans or export (``pretrain``,
``export``); ``models/pretrain_net.py`` imports ``network.py`` only, which imports nothing
from ``models/``. Without nnunetv2 (and without torch) every module but ``export.py`` imports:
nnU-Net is imported where a network is built and in the child processes.

Adding 3d_fullres: ``workspace.CONFIGURATION`` is the one place "2d" is named for planning,
training (its results folder ``training.TRAINER_FOLDER`` follows) and prediction (which
reads the configuration from the checkpoint); make it a parameter threaded from the
experiment (a new ``ExperimentConfig`` field) through ``planning`` and ``training`` and their
specs. nnU-Net from scratch in 3D then needs nothing more. Pre-training for it needs a 3D
``PretrainNetwork`` in ``models/`` (a 3D levels adapter beside ``NnUNetLevels``, volumes
instead of slices in the data pipeline); ``plans.network_from_plans`` refuses 3D
configurations until then, and ``network.build_nnunet`` and ``export.py`` already follow
whatever configuration the plans name.
"""
