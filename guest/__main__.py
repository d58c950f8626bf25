from vtick.guest.cli import main

raise SystemExit(main())
