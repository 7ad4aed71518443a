"""python -m opsdl_core.train --config RUN.yaml [--set SECTION.FIELD=VALUE ...]: one training run."""
from .recipe import main

raise SystemExit(main())
