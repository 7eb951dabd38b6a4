"""The tools around the engine: what reads a finished run or feeds a test, never what runs a pipeline.

``report`` (the HTML report), ``inspect`` (``avforge inspect``), ``loader`` (the training loader),
``samples`` (generated media with known truth), ``serve`` (a loopback HTTP server for them) and
``bench`` (``avforge bench``). The engine (the modules directly under ``pipeline/``) imports none of
them at import time: the CLI and the runner's report step import them when they are called.
"""
