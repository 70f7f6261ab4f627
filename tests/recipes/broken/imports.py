import attrs
import thcore.no_such_module
