"""``python -m pipelines.deploy <bundle> --out <folder>``: see :mod:`pipelines.deploy.build`."""

from .build import main

raise SystemExit(main())
