"""The web chat page and the browser SDK, installed as the package data of ``tokenwire.web``.

Nothing to import: the gateway serves these files from wherever this package was installed
(``TOKENWIRE_WEB_DIR`` overrides it).
"""
