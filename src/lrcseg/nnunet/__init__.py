"""The nnU-Net bridge: everything lrcseg does with nnU-Net v2 (the ``lrcseg[nnunet]`` extra).

One concept per module:

    plans.py        nnUNetPlans.json + dataset.json -> NnUNetNetworkConfig of the 2d or
                    3d_fullres configuration (``network_from_plans``); a pre-training set to
                    the plans' network, spacing, patch and CTNormalization (``apply_plans``;
                    3d_fullres: ``model.spatial_dims`` 3, views of the plans' patch)
    network.py      the plans' network, 2D or 3D, built by nnU-Net's get_network_from_plans
                    (``build_nnunet``); lrcseg's window channel -> CTNormalization
                    (``NnUNetInput``); whether weights load into it (``check_loads_into``)
    export.py       ``lrcseg export --format nnunet``: {"network_weights": ...} + its JSON;
                    ``--format nnunet-pretrained``: the checkpoint of nnU-Net master's
                    nnUNetv2_train_pretrained route (3d_fullres; read from its source)
    workspace.py    an nnU-Net work folder (raw / preprocessed), the environment and the
                    child processes nnU-Net runs in; the configurations lrcseg runs ("2d",
                    the default, and "3d_fullres")
    planning.py     nnU-Net's planning and preprocessing of a raw dataset, per configuration
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

The configuration: ``workspace.DEFAULT_CONFIGURATION`` ("2d") is the one place the default is
named; ``planning.plan_and_preprocess``, ``training.train`` / ``model_folder`` take a
``configuration`` ("2d" or "3d_fullres", ``workspace.CONFIGURATIONS``) and write it into their
child's spec; prediction reads it from the checkpoint. The experiment passes none yet, so it
runs 2d; threading an ``ExperimentConfig`` field through ``experiment/backends.py`` gives
nnU-Net from scratch in 3D. Pre-training for 3d_fullres: ``plans.apply_plans`` sets
``model.spatial_dims`` 3 and ``augment.patch_size`` to the plans' (D, H, W) patch (the volumes'
z spacing is kept: lrcseg resamples in-plane only); ``network.build_nnunet``, ``NnUNetInput``,
``network.check_loads_into`` and ``export.py`` take 2D and 3D networks alike.
"""
