"""Deployment: build self-contained MONAI Deploy application folders from trained bundles (:mod:`.build`) and the
applications themselves (:mod:`.apps`, which need the optional deploy stack of ``requirements-deploy.txt``)."""
