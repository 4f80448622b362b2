from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class NanPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NAN_POLICY_UNSPECIFIED: _ClassVar[NanPolicy]
    NAN_POLICY_PROPAGATE: _ClassVar[NanPolicy]
    NAN_POLICY_RAISE: _ClassVar[NanPolicy]
    NAN_POLICY_OMIT: _ClassVar[NanPolicy]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    INFO: _ClassVar[Severity]
    WARNING: _ClassVar[Severity]
    ERROR: _ClassVar[Severity]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
UINT8: DType
BOOL: DType
NAN_POLICY_UNSPECIFIED: NanPolicy
NAN_POLICY_PROPAGATE: NanPolicy
NAN_POLICY_RAISE: NanPolicy
NAN_POLICY_OMIT: NanPolicy
SEVERITY_UNSPECIFIED: Severity
INFO: Severity
WARNING: Severity
ERROR: Severity

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemoryRegion
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemoryRegion, _Mapping]] = ...) -> None: ...

class SharedMemoryRegion(_message.Message):
    __slots__ = ("name", "offset", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class FunctionSpec(_message.Message):
    __slots__ = ("name", "params", "inputs", "alias")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _struct_pb2.Struct
    inputs: _containers.ScalarMap[str, str]
    alias: str
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., inputs: _Optional[_Mapping[str, str]] = ..., alias: _Optional[str] = ...) -> None: ...

class Tags(_message.Message):
    __slots__ = ("model", "dataset", "split", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    model: str
    dataset: str
    split: str
    extra: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., dataset: _Optional[str] = ..., split: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class State(_message.Message):
    __slots__ = ("function", "version", "params_json", "fields", "batches")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    function: str
    version: int
    params_json: str
    fields: _containers.MessageMap[str, Tensor]
    batches: int
    def __init__(self, function: _Optional[str] = ..., version: _Optional[int] = ..., params_json: _Optional[str] = ..., fields: _Optional[_Mapping[str, Tensor]] = ..., batches: _Optional[int] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("tensors", "functions", "tags", "return_state", "request_id", "prior_states", "batch_id", "nan_policy")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class PriorStatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: State
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[State, _Mapping]] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIOR_STATES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    NAN_POLICY_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.MessageMap[str, Tensor]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionSpec]
    tags: Tags
    return_state: bool
    request_id: str
    prior_states: _containers.MessageMap[str, State]
    batch_id: str
    nan_policy: NanPolicy
    def __init__(self, tensors: _Optional[_Mapping[str, Tensor]] = ..., functions: _Optional[_Iterable[_Union[FunctionSpec, _Mapping]]] = ..., tags: _Optional[_Union[Tags, _Mapping]] = ..., return_state: _Optional[bool] = ..., request_id: _Optional[str] = ..., prior_states: _Optional[_Mapping[str, State]] = ..., batch_id: _Optional[str] = ..., nan_policy: _Optional[_Union[NanPolicy, str]] = ...) -> None: ...

class Diagnostic(_message.Message):
    __slots__ = ("code", "severity", "message", "function", "count")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    code: str
    severity: Severity
    message: str
    function: str
    count: int
    def __init__(self, code: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., message: _Optional[str] = ..., function: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class FunctionResult(_message.Message):
    __slots__ = ("alias", "function", "values", "tensors", "denominator", "denominator_kind", "state")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    alias: str
    function: str
    values: _containers.ScalarMap[str, float]
    tensors: _containers.MessageMap[str, Tensor]
    denominator: float
    denominator_kind: str
    state: State
    def __init__(self, alias: _Optional[str] = ..., function: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ..., denominator: _Optional[float] = ..., denominator_kind: _Optional[str] = ..., state: _Optional[_Union[State, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_seconds", "compute_seconds", "total_seconds")
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    decode_seconds: float
    compute_seconds: float
    total_seconds: float
    def __init__(self, decode_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("results", "diagnostics", "request_id", "timing", "batches")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FunctionResult]
    diagnostics: _containers.RepeatedCompositeFieldContainer[Diagnostic]
    request_id: str
    timing: Timing
    batches: int
    def __init__(self, results: _Optional[_Iterable[_Union[FunctionResult, _Mapping]]] = ..., diagnostics: _Optional[_Iterable[_Union[Diagnostic, _Mapping]]] = ..., request_id: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., batches: _Optional[int] = ...) -> None: ...

class NamedState(_message.Message):
    __slots__ = ("alias", "state")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    alias: str
    state: State
    def __init__(self, alias: _Optional[str] = ..., state: _Optional[_Union[State, _Mapping]] = ...) -> None: ...

class FinalizeRequest(_message.Message):
    __slots__ = ("states", "return_state", "tags", "request_id")
    STATES_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[NamedState]
    return_state: bool
    tags: Tags
    request_id: str
    def __init__(self, states: _Optional[_Iterable[_Union[NamedState, _Mapping]]] = ..., return_state: _Optional[bool] = ..., tags: _Optional[_Union[Tags, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListFunctionsRequest(_message.Message):
    __slots__ = ("family",)
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    family: str
    def __init__(self, family: _Optional[str] = ...) -> None: ...

class RoleInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "doc", "optional")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: str
    dtype: str
    doc: str
    optional: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[str] = ..., dtype: _Optional[str] = ..., doc: _Optional[str] = ..., optional: _Optional[bool] = ...) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "type", "default", "doc", "range", "choices", "nullable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default: _struct_pb2.Value
    doc: str
    range: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    nullable: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., doc: _Optional[str] = ..., range: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., nullable: _Optional[bool] = ...) -> None: ...

class OutputInfo(_message.Message):
    __slots__ = ("name", "doc", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    doc: str
    tensor: bool
    def __init__(self, name: _Optional[str] = ..., doc: _Optional[str] = ..., tensor: _Optional[bool] = ...) -> None: ...

class FunctionInfo(_message.Message):
    __slots__ = ("name", "family", "summary", "roles", "params", "outputs", "splittable", "reference", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SPLITTABLE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    summary: str
    roles: _containers.RepeatedCompositeFieldContainer[RoleInfo]
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputInfo]
    splittable: bool
    reference: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., summary: _Optional[str] = ..., roles: _Optional[_Iterable[_Union[RoleInfo, _Mapping]]] = ..., params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[OutputInfo, _Mapping]]] = ..., splittable: _Optional[bool] = ..., reference: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class DiagnosticInfo(_message.Message):
    __slots__ = ("code", "severity", "meaning")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    MEANING_FIELD_NUMBER: _ClassVar[int]
    code: str
    severity: Severity
    meaning: str
    def __init__(self, code: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., meaning: _Optional[str] = ...) -> None: ...

class ListFunctionsResponse(_message.Message):
    __slots__ = ("functions", "diagnostics")
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionInfo]
    diagnostics: _containers.RepeatedCompositeFieldContainer[DiagnosticInfo]
    def __init__(self, functions: _Optional[_Iterable[_Union[FunctionInfo, _Mapping]]] = ..., diagnostics: _Optional[_Iterable[_Union[DiagnosticInfo, _Mapping]]] = ...) -> None: ...
