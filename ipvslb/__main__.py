from ipvslb.cli import main

raise SystemExit(main())
