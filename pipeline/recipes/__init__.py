"""Recipes: packaged run configs, one YAML file per dataset style (``avforge recipes`` lists them).

Each file is a plain avforge config (validated by ``pipeline.config.RunConfig``); its first comment
line is ``# NAME: one-line description``. ``avforge run --recipe NAME`` starts from it, then applies
``--config`` files left to right and ``--set`` overrides.
"""
