from vtick.host.cli import main

raise SystemExit(main())
