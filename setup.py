"""The optional C accelerator for channel frames; pistream works without it (pure-Python bulk path)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pistream.stream._framecodec", ["pistream/stream/_framecodec.c"], optional=True,
                             extra_compile_args=["-O2"] if __import__("os").name != "nt" else [])])
