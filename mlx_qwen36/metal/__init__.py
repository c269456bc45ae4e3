"""Custom Metal kernels for Qwen3.6's hot paths (see README.md in this folder).

Kernel sources live here as `*.metal` files and ship with the package as data, so they load the same way from a
clone's source tree and from an installed wheel. The top-level `metal/` folder of the repository is a link to
this package.
"""
