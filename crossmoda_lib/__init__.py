"""crossmoda-companion: the library behind the notebooks.

Modules by concern: ``io`` (reading, validation, atomic writes), ``synth`` (synthetic cohort),
``preprocess`` (stage 01), ``config`` (profiles and paths), ``runs`` (headless execution),
``figures`` (plots saved from files), ``cli`` (the ``crossmoda`` command).
"""

__version__ = "0.1.0"
