"""Decoding methods, one file each: its drafter, its frozen `Options` dataclass and its registration.

A module in this package registers its method when imported (`registry.register`); the registry
imports every module of the package the first time a method is looked up. A method declares
everything the rest of the package lists about it — where it is listed, the candidates the tune
prices, the options the every-method tests run it with — so adding a method is adding one file
here (and its tests).

This module imports nothing: the command line reads `DEFAULT_METHOD` without importing torch.
"""

DEFAULT_METHOD = "auto"
"""The method of every entry point that is not told one: `specdec generate`/`serve`/`demo`,
`Pipeline.generate`/`generate_batch`/`decoder`, the server's requests and `BatchRequest`."""
