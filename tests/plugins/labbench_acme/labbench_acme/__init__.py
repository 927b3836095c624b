"""ACME's labbench plugin: the ACME M0 board family (its YAML, its flasher `acmeflash`, its DUT driver)
and the ACME PS1K power sampler, with simulators of both. Everything reaches labbench through the
entry points of pyproject.toml; docs/extending.md of labbench walks through it."""
