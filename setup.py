"""Builds the optional C scanner of HANDLE.NET access logs (connectors/resolution/_scan.c); everything else is in
pyproject.toml. ``optional=True``: when the extension cannot be built the install still succeeds, and the counter
falls back to its numpy path (it logs a warning saying so)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "connectors.resolution._scan",
            sources=["connectors/resolution/_scan.c"],
            libraries=["crypto"],  # OpenSSL's libcrypto: HMAC-SHA256 of the sample choice (Debian: libssl-dev)
            extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
