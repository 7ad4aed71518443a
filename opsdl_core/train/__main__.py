"""python -m opsdl_core.train --config RUN.yaml [--set SECTION.FIELD=VALUE ...]: one training run."""
from .job import main

raise SystemExit(main())
