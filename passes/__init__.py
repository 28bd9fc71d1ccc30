"""Built-in passes, one module per pass family.

Importing this package imports every module in it, and each module registers its passes
(``@register``) under their CLI names, so adding a pass means adding a module.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
