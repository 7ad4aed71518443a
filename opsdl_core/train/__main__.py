"""python -m opsdl_core.train --config RUN.yaml [--set SECTION.FIELD=VALUE ...]: one training run."""
from .run import main

raise SystemExit(main())
