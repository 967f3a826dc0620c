"""Builds fastsoup._core by driving CMake (CMakeLists.txt is the build; this only runs it).

Environment:
    CMAKE_ARGS                  extra CMake arguments, e.g. "-DFASTSOUP_CUDA=OFF -DFASTSOUP_CUDA_ARCHS=90"
    CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: all cores)
    FASTSOUP_DEBUG=1            a Debug build
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastsoup" / "_version.py").read_text()).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        cmake = shutil.which("cmake") or "cmake"
        generator = []
        try:
            import ninja

            ninja_bin = os.path.join(ninja.BIN_DIR, "ninja")
            generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja_bin}"]
        except ImportError:
            if shutil.which("ninja"):
                ninja_bin = shutil.which("ninja")
                generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja_bin}"]
        # An isolated pip build gets a fresh cmake/ninja each time: a cache that names another
        # generator program or cmake breaks the next configure, so start that build folder afresh.
        cache = build_temp / "CMakeCache.txt"
        if cache.exists():
            text = cache.read_text(errors="replace")
            stale = (generator and f"CMAKE_MAKE_PROGRAM:FILEPATH={generator[-1].split('=', 1)[1]}" not in text) or (
                f"CMAKE_COMMAND:INTERNAL={os.path.realpath(cmake)}" not in text and f"CMAKE_COMMAND:INTERNAL={cmake}" not in text
            )
            if stale:
                shutil.rmtree(build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)

        cfg = "Debug" if os.environ.get("FASTSOUP_DEBUG") == "1" else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DFASTSOUP_VERSION={VERSION}",
            "-DFASTSOUP_BUILD_TESTS=OFF",
            *generator,
        ]
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([cmake, str(ROOT), *cmake_args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--target", "_core", "--parallel", jobs], cwd=build_temp, check=True)


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("fastsoup._core")],
    cmdclass={"build_ext": CMakeBuild},
)
