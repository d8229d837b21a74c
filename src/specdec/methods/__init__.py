"""Decoding methods, one file each: its drafter, its frozen `Options` dataclass and its registration.

A module in this package registers its method when imported (`registry.register`); the registry
imports every module of the package the first time a method is looked up, so adding a method is
adding one file here.
"""
