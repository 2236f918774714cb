"""Private internals shared by the public subpackages; not part of the API.

Imports flow one way: `base`, `axis`, `validate`, `tree`, `workers`, `keys`, `feedback` are
imported by compressors, wire, transforms and optimizers, never the reverse.
"""
