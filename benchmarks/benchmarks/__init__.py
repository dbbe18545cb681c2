"""asv benchmark suite of kronsum (see ../asv.conf.json)."""
