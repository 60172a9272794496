from synwatch.cli import main

raise SystemExit(main())
