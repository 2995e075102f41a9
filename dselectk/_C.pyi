# Type stub of the compiled extension dselectk._C (dselectk/_binding/*.c over csrc/). Its functions
# are validated, documented and typed by their wrappers in dselectk.functional; to a type checker
# the raw bindings are untyped.
from typing import Any

def __getattr__(name: str) -> Any: ...
