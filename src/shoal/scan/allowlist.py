"""Which pickle globals a model file may import: an allowlist of data constructors.

Everything not on the allowlist is at least ``MEDIUM``; imports that execute code or touch files,
processes or the network are ``CRITICAL``; attribute traversal and dunder names are ``HIGH`` or
worse. Names are matched exactly (after pickle's own Python 2 name mapping), never by prefix.
"""

from __future__ import annotations

import _compat_pickle
import re

from shoal.scan.report import Severity

__all__ = [
    "SAFE_GLOBALS",
    "classify_global",
    "is_allowed",
    "normalize_global",
]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _names(module: str, names: str) -> set[tuple[str, str]]:
    return {(module, n) for n in names.split()}


_NUMPY_SCALARS = (
    "bool bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 intc uintc intp uintp "
    "longlong ulonglong float16 float32 float64 longdouble half single double complex64 "
    "complex128 clongdouble csingle cdouble str_ bytes_ void object_ datetime64 timedelta64 "
    "byte ubyte short ushort int_ uint long ulong"
)

_TORCH_DTYPES = (
    "bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 "
    "float16 float32 float64 float4_e2m1fn_x2 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
    "float8_e5m2fnuz float8_e8m0fnu half float double long int short cfloat cdouble "
    "int1 int2 int3 int4 int5 int6 int7 int8 int16 int32 int64 "
    "uint1 uint2 uint3 uint4 uint5 uint6 uint7 uint8 uint16 uint32 uint64 "
    "qint32 qint8 quint2x4 quint4x2 quint8 "
    "per_channel_affine per_channel_affine_float_qparams per_channel_symmetric "
    "per_tensor_affine per_tensor_symmetric strided sparse_coo sparse_csr sparse_csc "
    "sparse_bsr sparse_bsc _mkldnn channels_last contiguous_format preserve_format"
)

_TORCH_STORAGES = (
    "BFloat16 Bool Byte Char ComplexDouble ComplexFloat Double Float Half Int Long "
    "QInt32 QInt8 QUInt2x4 QUInt4x2 QUInt8 Short"
)

_TORCH_REBUILDERS = (
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter "
    "_rebuild_parameter_with_state _rebuild_qtensor _rebuild_sparse_tensor "
    "_rebuild_nested_tensor _rebuild_device_tensor_from_numpy "
    "_rebuild_device_tensor_from_cpu_tensor _rebuild_meta_tensor_no_storage "
    "_rebuild_wrapper_subclass"
)

# Estimators (sklearn.utils.all_estimators() of scikit-learn 1.9) and the internal classes that
# fitted estimators pickle. Matched by name under any ``sklearn.`` module path, because private
# module paths move between releases while class names do not.
_SKLEARN_NAMES = _words(
    """
    ARDRegression AdaBoostClassifier AdaBoostRegressor AdditiveChi2Sampler AffinityPropagation
    AgglomerativeClustering BaggingClassifier BaggingRegressor BayesianGaussianMixture
    BayesianRidge BernoulliNB BernoulliRBM Binarizer Birch BisectingKMeans CCA
    CalibratedClassifierCV CategoricalNB ClassicalMDS ClassifierChain ColumnTransformer
    ComplementNB CountVectorizer DBSCAN DecisionTreeClassifier DecisionTreeRegressor
    DictVectorizer DictionaryLearning DummyClassifier DummyRegressor ElasticNet ElasticNetCV
    EllipticEnvelope EmpiricalCovariance ExtraTreeClassifier ExtraTreeRegressor
    ExtraTreesClassifier ExtraTreesRegressor FactorAnalysis FastICA FeatureAgglomeration
    FeatureHasher FeatureUnion FixedThresholdClassifier FrozenEstimator GammaRegressor
    GaussianMixture GaussianNB GaussianProcessClassifier GaussianProcessRegressor
    GaussianRandomProjection GenericUnivariateSelect GradientBoostingClassifier
    GradientBoostingRegressor GraphicalLasso GraphicalLassoCV GridSearchCV HDBSCAN
    HashingVectorizer HistGradientBoostingClassifier HistGradientBoostingRegressor
    HuberRegressor IncrementalPCA IsolationForest Isomap IsotonicRegression KBinsDiscretizer
    KMeans KNNImputer KNeighborsClassifier KNeighborsRegressor KNeighborsTransformer
    KernelCenterer KernelDensity KernelPCA KernelRidge LabelBinarizer LabelEncoder
    LabelPropagation LabelSpreading Lars LarsCV Lasso LassoCV LassoLars LassoLarsCV LassoLarsIC
    LatentDirichletAllocation LedoitWolf LinearDiscriminantAnalysis LinearRegression LinearSVC
    LinearSVR LocalOutlierFactor LocallyLinearEmbedding LogisticRegression LogisticRegressionCV
    MDS MLPClassifier MLPRegressor MaxAbsScaler MeanShift MinCovDet MinMaxScaler
    MiniBatchDictionaryLearning MiniBatchKMeans MiniBatchNMF MiniBatchSparsePCA MissingIndicator
    MultiLabelBinarizer MultiOutputClassifier MultiOutputRegressor MultiTaskElasticNet
    MultiTaskElasticNetCV MultiTaskLasso MultiTaskLassoCV MultinomialNB NMF NearestCentroid
    NearestNeighbors NeighborhoodComponentsAnalysis Normalizer NuSVC NuSVR Nystroem OAS OPTICS
    OneClassSVM OneHotEncoder OneVsOneClassifier OneVsRestClassifier OrdinalEncoder
    OrthogonalMatchingPursuit OrthogonalMatchingPursuitCV OutputCodeClassifier PCA PLSCanonical
    PLSRegression PLSSVD PassiveAggressiveClassifier PassiveAggressiveRegressor PatchExtractor
    Perceptron Pipeline PoissonRegressor PolynomialCountSketch PolynomialFeatures
    PowerTransformer QuadraticDiscriminantAnalysis QuantileRegressor QuantileTransformer
    RANSACRegressor RBFSampler RFE RFECV RadiusNeighborsClassifier RadiusNeighborsRegressor
    RadiusNeighborsTransformer RandomForestClassifier RandomForestRegressor RandomTreesEmbedding
    RandomizedSearchCV RegressorChain Ridge RidgeCV RidgeClassifier RidgeClassifierCV
    RobustScaler SGDClassifier SGDOneClassSVM SGDRegressor SVC SVR SelectFdr SelectFpr
    SelectFromModel SelectFwe SelectKBest SelectPercentile SelfTrainingClassifier
    SequentialFeatureSelector ShrunkCovariance SimpleImputer SkewedChi2Sampler SparseCoder
    SparsePCA SparseRandomProjection SpectralBiclustering SpectralClustering
    SpectralCoclustering SpectralEmbedding SplineTransformer StackingClassifier
    StackingRegressor StandardScaler TSNE TargetEncoder TfidfTransformer TfidfVectorizer
    TheilSenRegressor TransformedTargetRegressor TruncatedSVD TunedThresholdClassifierCV
    TweedieRegressor VarianceThreshold VotingClassifier VotingRegressor
    Tree TreePredictor _BinMapper AdamOptimizer SGDOptimizer Bunch Interval
    HalfSquaredError AbsoluteError PinballLoss HuberLoss HalfPoissonLoss HalfGammaLoss
    HalfTweedieLoss HalfTweedieLossIdentity HalfBinomialLoss HalfMultinomialLoss
    ExponentialLoss IdentityLink LogLink LogitLink HalfLogitLink MultinomialLogit
    CyHalfSquaredError CyAbsoluteError CyPinballLoss CyHuberLoss CyHalfPoissonLoss
    CyHalfGammaLoss CyHalfTweedieLoss CyHalfTweedieLossIdentity CyHalfBinomialLoss
    CyExponentialLoss CyHalfMultinomialLoss
    KDTree BallTree EuclideanDistance64 EuclideanDistance32 ManhattanDistance64
    ManhattanDistance32 MinkowskiDistance64 MinkowskiDistance32 ChebyshevDistance64
    ChebyshevDistance32 SEuclideanDistance64 SEuclideanDistance32 MahalanobisDistance64
    MahalanobisDistance32 HaversineDistance64 HaversineDistance32
    RBF Matern RationalQuadratic ExpSineSquared DotProduct WhiteKernel ConstantKernel Sum
    Product Exponentiation Hyperparameter
    _Scorer _PassthroughScorer _MultimetricScorer
    BaseDecisionTree
    """
)
_SKLEARN_CYTHON = re.compile(r"__pyx_unpickle_[A-Za-z0-9_]+|newObj")
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    _names("builtins", "set frozenset slice complex bytearray bytes range object dict list")
    | _names("builtins", "tuple int float str bool Ellipsis NotImplemented")
    | _names("collections", "OrderedDict Counter defaultdict deque")
    | _names("copyreg", "_reconstructor")
    | _names("_codecs", "encode")
    | _names("datetime", "datetime date time timedelta timezone")
    | _names("decimal", "Decimal")
    | _names("fractions", "Fraction")
    | _names("numpy", "ndarray dtype matrix " + _NUMPY_SCALARS)
    | _names("numpy.core.multiarray", "_reconstruct scalar")
    | _names("numpy._core.multiarray", "_reconstruct scalar")
    | _names("numpy.core.numeric", "_frombuffer")
    | _names("numpy._core.numeric", "_frombuffer")
    | _names("numpy.ma", "MaskedArray")
    | _names("numpy.ma.core", "MaskedArray _mareconstruct")
    | _names("numpy.matrixlib.defmatrix", "matrix")
    | _names("numpy.random._pickle", "__randomstate_ctor __generator_ctor __bit_generator_ctor")
    | _names("numpy.random.mtrand", "RandomState")
    | _names("numpy.random._generator", "Generator")
    | _names("numpy.random._mt19937", "MT19937")
    | _names("numpy.random._pcg64", "PCG64 PCG64DXSM")
    | _names("numpy.random._philox", "Philox")
    | _names("numpy.random._sfc64", "SFC64")
    | _names("numpy.random.bit_generator", "SeedSequence __pyx_unpickle_SeedSequence")
    | _names("scipy.sparse", "csr_matrix csc_matrix coo_matrix csr_array csc_array coo_array")
    | _names("scipy.sparse._csr", "csr_matrix csr_array")
    | _names("scipy.sparse._csc", "csc_matrix csc_array")
    | _names("scipy.sparse._coo", "coo_matrix coo_array")
    | _names("torch", "Size Tensor device " + _TORCH_DTYPES)
    | {("torch", s + "Storage") for s in _TORCH_STORAGES.split()}
    | {("torch.cuda", s + "Storage") for s in _TORCH_STORAGES.split()}
    | _names("torch.storage", "TypedStorage UntypedStorage")
    | _names("torch._utils", _TORCH_REBUILDERS)
    | _names("torch._tensor", "_rebuild_from_type_v2")
    | _names("torch.nn.parameter", "Parameter Buffer")
    | _names("torch.serialization", "_get_layout")
    | _names("joblib.numpy_pickle", "NumpyArrayWrapper")
    | _names(
        "torch.jit._pickle",
        "build_intlist build_doublelist build_boollist build_tensorlist restore_type_tag",
    )
)

# Whole modules (and their submodules) whose globals run code or do I/O when called.
_CRITICAL_MODULES = _words(
    """
    os posix nt posixpath ntpath subprocess _posixsubprocess sys runpy pty socket _socket ssl
    shutil webbrowser importlib imp code codeop ctypes _ctypes cffi pickle _pickle cPickle
    pickletools dill cloudpickle marshal types pdb bdb trace profile cProfile timeit asyncio
    multiprocessing concurrent threading _thread signal platform pkgutil zipimport http urllib
    urllib2 urllib3 requests httpx aiohttp ftplib smtplib poplib imaplib telnetlib xmlrpc
    socketserver pydoc commands popen2 io _io codecs pathlib fileinput glob tempfile mailcap
    distutils setuptools pip venv ensurepip site sysconfig inspect operator _operator functools
    gc sqlite3 dbm shelve logging tkinter idlelib lib2to3 zipfile tarfile gzip bz2 lzma
    builtins __builtin__ copyreg copy_reg ast compileall py_compile dis
    uuid selectors select mmap resource syslog getpass readline rlcompleter atexit
    weakref contextlib sched smtpd nntplib wsgiref cgi cgitb xml IPython jinja2 yaml
    numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib numpy.lib.npyio
    numpy.lib._npyio_impl numpy.lib.format numpy.lib.utils numpy.lib._utils_impl
    torch.utils.collect_env torch.hub torch.jit torch._dynamo torch._inductor torch.fx
    torch.utils.cpp_extension torch.package torch.ops torch._ops torch._C torch.distributed
    torch.multiprocessing torch.testing torch.compiler torch.serialization torch.storage
    torch.utils.data torch.library torch.export torch.onnx
    joblib keras tensorflow tf_keras pandas.io
    """
)

# Names that mean "run, open, fetch or resolve something" in whatever module they live.
_CRITICAL_NAMES = _words(
    """
    system popen popen2 popen3 popen4 exec execv execve execvp execvpe execl execle execlp
    execlpe eval spawn spawnv spawnve spawnl spawnle spawnlp spawnvp posix_spawn run runstring
    runctx runcall call check_call check_output getoutput getstatusoutput Popen compile open
    load loads load_model import_module __import__ getattr setattr delattr globals locals vars
    breakpoint input remove rmtree unlink rmdir kill fork forkpty write write_text write_bytes
    urlopen urlretrieve methodcaller attrgetter itemgetter partial reduce resolve_name locate
    findmatch fromfile tofile memmap loadtxt savetxt genfromtxt save savez savez_compressed
    DataSource _load_from_bytes from_file
    """
)


def normalize_global(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names to Python 3 ones, exactly as ``pickle.Unpickler.find_class`` does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _sklearn_allowed(module: str, name: str) -> bool:
    return (
        (module == "sklearn" or module.startswith("sklearn."))
        and _MODULE_PATH.fullmatch(module) is not None
        and (name in _SKLEARN_NAMES or _SKLEARN_CYTHON.fullmatch(name) is not None)
    )


def is_allowed(module: str, name: str) -> bool:
    """True when importing ``module.name`` from a pickle is known to be safe."""
    module, name = normalize_global(module, name)
    return (module, name) in SAFE_GLOBALS or _sklearn_allowed(module, name)


def _in_modules(module: str, modules: frozenset[str]) -> str | None:
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix
    return None


def classify_global(module: str, name: str) -> tuple[Severity, str]:
    """Severity and reason for a pickle importing ``module.name`` (never imports anything)."""
    module, name = normalize_global(module, name)
    qual = f"{module}.{name}"
    if (module, name) in SAFE_GLOBALS or _sklearn_allowed(module, name):
        return Severity.NONE, f"{qual} is an allowlisted data constructor"
    if not _MODULE_PATH.fullmatch(module) or not _MODULE_PATH.fullmatch(name):
        return Severity.HIGH, f"{qual!r} is not a valid dotted name (cannot be resolved safely)"
    if module == "__torch__" or module.startswith("__torch__."):
        return (
            Severity.MEDIUM,
            f"{qual} is a TorchScript class: its code is compiled from the archive",
        )
    parts = name.split(".")
    dunders = [p for p in (*module.split("."), *parts) if p.startswith("__") and p.endswith("__")]
    if dunders:
        return (
            Severity.CRITICAL,
            f"{qual} reaches dunder attribute {dunders[0]} (escapes to interpreter internals)",
        )
    hit = _in_modules(module, _CRITICAL_MODULES) or _in_modules(
        f"{module}.{name}", _CRITICAL_MODULES
    )
    if hit is not None:
        return Severity.CRITICAL, f"{qual} comes from {hit}, which can run code or do I/O"
    bad = [p for p in parts if p in _CRITICAL_NAMES]
    if bad:
        return Severity.CRITICAL, f"{qual}: {bad[0]!r} runs, opens or resolves arbitrary things"
    if len(parts) > 1:
        return Severity.HIGH, f"{qual} traverses attributes ({name!r}) beyond a module global"
    return Severity.MEDIUM, f"{qual} is not on the allowlist (unknown code would be imported)"
