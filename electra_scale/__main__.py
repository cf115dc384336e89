from electra_scale.cli import main

raise SystemExit(main())
