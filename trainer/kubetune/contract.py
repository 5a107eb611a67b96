"""Names shared by the operator and the trainer: env vars, labels, ports, paths, exit codes.

One module so both sides agree (kubeflow trainer's constants.go is the model).
"""

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAME = "ftj"

# Exit codes. 2 is never retried; RETRY asks the Job controller to restart the pod.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_RETRY = 75  # EX_TEMPFAIL: preempted after a checkpoint, safe to restart

# Environment the operator sets on trainer pods (torchrun rendezvous + our own).
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_NNODES = "NNODES"
ENV_NODE_RANK = "NODE_RANK"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_SPEC_PATH = "KUBETUNE_SPEC_PATH"
ENV_WORK_DIR = "KUBETUNE_WORK_DIR"
ENV_METRICS_PORT = "KUBETUNE_METRICS_PORT"
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
ENV_JOB_NAME = "KUBETUNE_JOB_NAME"
ENV_NAMESPACE = "KUBETUNE_NAMESPACE"
ENV_GRACE_SECONDS = "KUBETUNE_GRACE_SECONDS"
ENV_COLLECTIVE_TIMEOUT = "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS"
ENV_STATE_DIR = "KUBETUNE_STATE_DIR"

# Credentials come from the Secret in spec.storage.secretRef via secretKeyRef.
SECRET_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"

DEFAULT_MASTER_PORT = 29500
DEFAULT_METRICS_PORT = 9400
DEFAULT_OPERATOR_METRICS_PORT = 9401
DEFAULT_GRACE_SECONDS = 30
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 600

# Paths inside trainer pods.
SPEC_MOUNT_PATH = "/etc/kubetune/spec.yaml"
WORK_DIR = "/var/lib/kubetune"
TERMINATION_LOG = "/dev/termination-log"

# Labels on every child object.
LABEL_JOB_NAME = "kubetune.io/job-name"
LABEL_COMPONENT = "kubetune.io/component"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"

# Object layout under output.uri and checkpoint.uri.
MANIFEST_NAME = "manifest.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
MODEL_CARD = "README.md"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
