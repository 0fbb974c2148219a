"""The 3D-parallel engine, installed as `megagen.parallel` (see megagen/import_shadow.py for the guard)."""

if __name__ != "megagen.parallel":  # the clone is on sys.path and someone wants PyPI's `parallel`
    from megagen.import_shadow import step_aside

    step_aside(__name__, __file__)
