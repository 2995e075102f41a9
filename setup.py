"""Build of the dselectk C extension.

Everything that is not plain setuptools lives in ``build_ext_dselectk``:

* BLAS comes from the ``scipy-openblas32`` wheel, a *build* requirement (pyproject.toml). Its
  ``libscipy_openblas.so`` is copied into the installed package (``dselectk/_lib/``) and the
  extension finds it through a relative rpath (``$ORIGIN/_lib``), so at run time nothing imports
  ``scipy_openblas32``: its maintainers ask third parties not to depend on it at run time, where it
  would clash with SciPy's copy. The symbols carry the ``scipy_`` prefix, so they cannot collide
  with another OpenBLAS loaded in the same process either.
* OpenMP is compile-tested (``-fopenmp``) and used when present; no kernel needs it any more (their
  loops and products run on the pool of ``csrc/threads.c``, plain pthreads). ``DSELECTK_NO_OPENMP=1``
  opts out.
* ``DSELECTK_WERROR=1`` adds ``-Werror`` (CI sets it); the C code builds clean with -Wall -Wextra.
* ``DSELECTK_SANITIZE=address,undefined`` (CI's ``.ci/sanitize``) builds with those sanitizers
  (``-fsanitize=...``, reports fatal, frame pointers, -O1 -g) for testing only: every parallel loop
  and product then runs on the pool's threads however little work it has (``DSK_PARALLEL_MIN_WORK=0``), and ``dselectk/_sanitizer_selftest*.so`` is built beside the
  extension from ``.ci/sanitizer_selftest.c`` with the same flags (deliberate bugs the job must catch).
"""
import glob
import os
import shutil
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_SOURCES = [
    "csrc/comet.c",
    "csrc/conv.c",
    "csrc/embedding.c",
    "csrc/gates.c",
    "csrc/gemm.c",
    "csrc/linear.c",
    "csrc/nn.c",
    "csrc/optim.c",
    "csrc/sinkhorn.c",
    "csrc/threads.c",
]
# The binding, one file per kernel family (dselectk/_binding/module.c says how to add one).
BINDING_SOURCES = [
    "dselectk/_binding/common.c",
    "dselectk/_binding/module.c",
    "dselectk/_binding/gates.c",
    "dselectk/_binding/mix.c",
    "dselectk/_binding/nn.c",
    "dselectk/_binding/optim.c",
    "dselectk/_binding/embedding.c",
    "dselectk/_binding/conv.c",
    "dselectk/_binding/comet.c",
    "dselectk/_binding/sinkhorn.c",
]
HEADERS = sorted(glob.glob("csrc/*.h")) + ["dselectk/_binding/common.h"]


def _openblas():
    """(include dir, lib dir, library file name) of the scipy-openblas32 build dependency."""
    try:
        import scipy_openblas32
    except ImportError as exc:  # pragma: no cover - only without build isolation
        raise RuntimeError(
            "building dselectk needs the scipy-openblas32 wheel (a build dependency): "
            "`pip install .` installs it automatically; with --no-build-isolation run "
            "`pip install scipy-openblas32` first"
        ) from exc
    return (
        scipy_openblas32.get_include_dir(),
        scipy_openblas32.get_lib_dir(),
        scipy_openblas32.get_library(fullname=True),
    )


SANITIZE = os.environ.get("DSELECTK_SANITIZE", "").strip()
SANITIZER_SELFTEST = ".ci/sanitizer_selftest.c"


def _sanitizer_flags():
    """Compile and link flags of a DSELECTK_SANITIZE build (empty without it)."""
    if not SANITIZE:
        return []
    # -fno-wrapv undoes CPython's -fwrapv (in the flags setuptools passes first), under which signed
    # overflow is defined and UBSan would not check it: in our size arithmetic it is a bug either way
    return [f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-fno-wrapv"]


class build_ext_dselectk(build_ext):
    def _compiles_with_openmp(self, extra_flags):
        # The probe compiles and links with the flags of the real build: a sanitizer build whose
        # probe linked without -fsanitize failed on the sanitizer's symbols and fell back to serial
        # kernels, so that its threaded loops were never checked.
        tmp = tempfile.mkdtemp()
        try:
            src = os.path.join(tmp, "omp_probe.c")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
            flags = ["-fopenmp", *extra_flags]
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            self.compiler.link_executable(objs, "omp_probe", output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:  # any compiler or linker failure means "no OpenMP"
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def build_extensions(self):
        include_dir, lib_dir, lib_file = _openblas()
        sanitizer_flags = _sanitizer_flags()
        use_openmp = os.environ.get("DSELECTK_NO_OPENMP", "") not in ("1", "true", "yes")
        if use_openmp and not self._compiles_with_openmp(sanitizer_flags):
            print("dselectk: the compiler does not support -fopenmp; building without it (the kernels' "
                  "threads are the pool's, csrc/threads.c)", file=sys.stderr)
            use_openmp = False
        elif not use_openmp:
            print("dselectk: DSELECTK_NO_OPENMP set, building without OpenMP", file=sys.stderr)

        # -fvisibility=hidden: the binding's files share plain extern names (input_array, overlaps, ...);
        # hidden, they cannot be bound to like-named symbols of other libraries. PyInit__C stays
        # exported (PyMODINIT_FUNC marks it visible).
        # -fno-trapping-math: no kernel enables floating-point traps or reads the exception flags, so
        # the compiler may evaluate both sides of a select: the smooth-step's loops (saturation and
        # sign selects) then vectorize instead of branching on every element. It changes no result
        # (IEEE rounding is untouched, unlike -ffast-math).
        cflags = ["-std=c99", "-O3", "-Wall", "-Wextra", "-fno-strict-aliasing", "-fno-math-errno",
                  "-fno-trapping-math", "-fvisibility=hidden", "-pthread"]
        if os.environ.get("DSELECTK_WERROR", "") in ("1", "true", "yes"):
            cflags.append("-Werror")
        ldflags = ["-Wl,-rpath,$ORIGIN/_lib", "-pthread"]
        if use_openmp:
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
        if SANITIZE:
            cflags += [*sanitizer_flags, "-O1", "-DDSK_PARALLEL_MIN_WORK=0"]  # -O1 after -O3 wins
            ldflags += sanitizer_flags

        import numpy

        lib_name = lib_file[3:].rsplit(".so", 1)[0]  # libscipy_openblas.so -> scipy_openblas
        for ext in self.extensions:
            ext.include_dirs += ["csrc", include_dir, numpy.get_include()]
            ext.library_dirs += [lib_dir]
            ext.libraries += [lib_name]
            ext.extra_compile_args += cflags
            ext.extra_link_args += ldflags
            ext.define_macros += [
                ("DSK_HAVE_OPENMP", "1" if use_openmp else "0"),
                ("DSK_BLAS_NAME", '"scipy-openblas32 (' + lib_file + ')"'),
                ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
            ]
        super().build_extensions()
        # Vendor the BLAS next to the extension in the build tree: <package>/_lib/libscipy_openblas.so
        self._vendor_blas(os.path.join(self.build_lib, "dselectk"), lib_dir, lib_file)

    def run(self):
        super().run()
        if self.inplace:  # editable installs and `build_ext --inplace` load from the source tree
            _, lib_dir, lib_file = _openblas()
            self._vendor_blas(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dselectk"), lib_dir, lib_file)

    @staticmethod
    def _vendor_blas(package_dir, lib_dir, lib_file):
        dest_dir = os.path.join(package_dir, "_lib")
        os.makedirs(dest_dir, exist_ok=True)
        shutil.copy2(os.path.join(lib_dir, lib_file), os.path.join(dest_dir, lib_file))


extensions = [Extension("dselectk._C", sources=BINDING_SOURCES + KERNEL_SOURCES, depends=HEADERS)]
if SANITIZE:  # a plain shared library (loaded with ctypes), built with the extension's flags
    extensions.append(Extension("dselectk._sanitizer_selftest", sources=[SANITIZER_SELFTEST, "csrc/threads.c"],
                                depends=["csrc/dsk.h"]))

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": build_ext_dselectk},
)
