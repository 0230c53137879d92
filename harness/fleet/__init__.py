"""Fleet services the harness runs in the lab: the AWS IoT Jobs MQTT API, the image host, telemetry,
the time service.

They meet devices only on real interfaces (MQTT over TLS on the rig's broker, HTTP); see
``docs/interfaces.md``, section "Fleet services (MQTT and HTTP)".
"""

from .imagehost import ImageHost, ImageHostError, ImageRequest
from .jobs import JobsError, JobsService, JobsTimeout, StatusChange
from .mqtt import Message, MessageLog, MqttClient, MqttError, MqttTimeout, topic_matches
from .telemetry import ROLLBACK_METRIC, MetricEvent, Telemetry, TelemetryTimeout, telemetry_topic
from .timesvc import TimeAnswer, TimeRequest, TimeService, TimeServiceError, TimeServiceTimeout

__all__ = [
    "ROLLBACK_METRIC",
    "ImageHost",
    "ImageHostError",
    "ImageRequest",
    "JobsError",
    "JobsService",
    "JobsTimeout",
    "Message",
    "MessageLog",
    "MetricEvent",
    "MqttClient",
    "MqttError",
    "MqttTimeout",
    "StatusChange",
    "Telemetry",
    "TelemetryTimeout",
    "TimeAnswer",
    "TimeRequest",
    "TimeService",
    "TimeServiceError",
    "TimeServiceTimeout",
    "telemetry_topic",
    "topic_matches",
]
