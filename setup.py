"""Builds the optional compiled kernels ``fusedlr._C`` (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .      # uses the installed torch

Environment:
    FUSEDLR_BUILD_EXT=0|1     0: pure-Python install. 1: the extension must build (errors are fatal).
                              Unset: try, and on failure warn and install without it.
    FUSEDLR_BUILD_CUDA=0|1    0: CPU kernels only. 1: the CUDA kernels must build. Unset: build them
                              when torch has CUDA (torch.version.cuda) and nvcc is found, falling back
                              to the CPU kernels if that fails.
    CUDA_HOME                 the CUDA folder. Unset: found from the nvcc on PATH (following links and
                              wrapper scripts, see ``cuda_home``); ``python setup.py --cuda-home`` prints it
                              (and ``python setup.py --nvcc-flags`` the flags the .cu files are built with).
    TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0+PTX").
    MAX_JOBS                  parallel compile jobs (ninja).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import traceback

from setuptools import setup

CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/adamw_cpu.cpp", "csrc/plan_watch.cpp", "csrc/step_plan.cpp"]
CUDA_SOURCES = [
    "csrc/cuda/bindings_cuda.cpp", "csrc/cuda/launchers.cpp", "csrc/cuda/grad_stats.cu", "csrc/cuda/adamw_update.cu"
]
CUDA_LIBRARIES = ("cudart", "c10_cuda", "torch_cuda")
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# -lineinfo: line tables (no change to the code) so that tests/test_machine_code.py can tell loops apart.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
HINT = "set FUSEDLR_BUILD_EXT=1 to make this an error, or FUSEDLR_BUILD_EXT=0 to skip the extension"


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 0 or 1, got {value!r}")


BUILD_EXT = _flag("FUSEDLR_BUILD_EXT")
BUILD_CUDA = _flag("FUSEDLR_BUILD_CUDA")
FORCED = BUILD_EXT is True or BUILD_CUDA is True


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (fusedlr): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _is_cuda_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def cuda_home() -> tuple[str | None, str]:
    """The CUDA folder (holding bin/nvcc and include/cuda_runtime.h) and how it was found.

    torch guesses the folder above the first ``nvcc`` on PATH, which is wrong when that nvcc is a
    link or a wrapper script living elsewhere (e.g. /usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc). Here: $CUDA_HOME / $CUDA_PATH if set; else the folder above the
    nvcc on PATH once links are resolved; else the folder nvcc itself reports (``nvcc --dryrun``
    prints the bin folder it runs from as ``_HERE_``); else /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        real = os.path.realpath(nvcc)
        folder = os.path.dirname(os.path.dirname(real))
        if _is_cuda_folder(folder):
            how = "the nvcc on PATH" if real == nvcc else f"the nvcc on PATH ({nvcc} -> {real})"
            return folder, how
        try:
            proc = subprocess.run(
                [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            found = re.search(r"^#\$ _HERE_=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
        except (OSError, subprocess.SubprocessError):
            found = None
        if found is not None:
            folder = os.path.dirname(os.path.realpath(found.group(1).strip()))
            if _is_cuda_folder(folder):
                return folder, f"asking {nvcc} (a wrapper outside the CUDA folder) with --dryrun"
    if _is_cuda_folder("/usr/local/cuda"):
        return "/usr/local/cuda", "the default location"
    return None, "no nvcc on PATH, no $CUDA_HOME, no /usr/local/cuda"


def _set_cuda_home() -> None:
    """Export the CUDA folder for torch.utils.cpp_extension (which reads it when first imported)."""
    folder, how = cuda_home()
    if folder is None:
        print(f"fusedlr: no CUDA folder found ({how})", file=sys.stderr, flush=True)
        return
    os.environ["CUDA_HOME"] = folder
    print(f"fusedlr: CUDA folder {folder} (from {how})", file=sys.stderr, flush=True)


def _want_cuda() -> bool:
    if BUILD_CUDA is not None:
        return BUILD_CUDA
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extension(cuda: bool):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    include_dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")]
    if not cuda:
        return CppExtension(
            "fusedlr._C",
            CPU_SOURCES,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return CUDAExtension(
        "fusedlr._C",
        CPU_SOURCES + CUDA_SOURCES,
        include_dirs=include_dirs,
        define_macros=[("FUSEDLR_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )


def _to_cpu_only(ext) -> None:
    """Turn the CUDA extension into the CPU one in place (keeping the flags BuildExtension added)."""
    ext.sources = [s for s in ext.sources if s not in CUDA_SOURCES]
    ext.define_macros = [m for m in ext.define_macros if m[0] != "FUSEDLR_WITH_CUDA"]
    ext.libraries = [lib for lib in ext.libraries if lib not in CUDA_LIBRARIES]


def _cmdclass_and_modules():
    if BUILD_EXT is False:
        return {}, []
    try:
        from torch.utils.cpp_extension import BuildExtension

        cuda = _want_cuda()
        try:
            ext = _extension(cuda)
        except Exception as err:  # e.g. CUDA_HOME not found
            if not cuda or BUILD_CUDA is True:
                raise
            _warn(f"cannot set up the CUDA kernels ({err!r}); building the CPU kernels only")
            cuda = False
            ext = _extension(False)
    except Exception as err:  # torch missing or unusable
        if FORCED:
            raise
        _warn(f"cannot build the compiled kernels ({err!r}); installing the pure-Python package. {HINT}")
        return {}, []

    class OptionalBuildExt(BuildExtension):
        """BuildExtension that installs without the extension when building it fails (unless forced)."""

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
                return
            except (Exception, SystemExit) as err:
                if FORCED and not (BUILD_EXT is True and BUILD_CUDA is None and cuda):
                    raise
                failure = err
                traceback.print_exc()
            if cuda:
                _warn(f"building the CUDA kernels failed ({failure!r}); retrying with the CPU kernels only")
                _to_cpu_only(ext)
                try:
                    super().build_extension(ext)
                    return
                except (Exception, SystemExit) as err:
                    if FORCED:
                        raise
                    failure = err
                    traceback.print_exc()
            _warn(
                f"building fusedlr._C failed ({failure!r}); installing the pure-Python package "
                f"(backend='torch'/'triton' still work). {HINT}"
            )
            ext.optional = True  # setuptools then skips copying the missing library
            stale = self.get_ext_fullpath(ext.name)
            if os.path.exists(stale):  # never install a library left over from an older build
                os.remove(stale)

    return {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}, [ext]


if __name__ == "__main__" and sys.argv[1:] == ["--cuda-home"]:
    folder, how = cuda_home()
    print(folder or "", flush=True)
    print(f"fusedlr: CUDA folder {folder} (from {how})", file=sys.stderr, flush=True)
    sys.exit(0 if folder else 1)
if __name__ == "__main__" and sys.argv[1:] == ["--nvcc-flags"]:
    print(" ".join(NVCC_FLAGS))
    sys.exit(0)
if BUILD_EXT is not False and BUILD_CUDA is not False:
    _set_cuda_home()
cmdclass, ext_modules = _cmdclass_and_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
