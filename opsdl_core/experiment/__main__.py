"""python -m opsdl_core.experiment --config EXPERIMENT.yaml [--set SECTION.FIELD=VALUE ...]: one experiment."""
from .run import main

raise SystemExit(main())
