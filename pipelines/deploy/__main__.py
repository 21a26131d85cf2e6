"""``python -m clinseg.pipelines.deploy <bundle> --out <folder>``: see :mod:`pipelines.deploy.build`."""

from clinseg.pipelines.deploy.build import main

raise SystemExit(main())
