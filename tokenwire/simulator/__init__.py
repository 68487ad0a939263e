"""A Dify Service API simulator: real HTTP, Dify's wire formats, several apps, scripted faults.

Apps
----
Dify names an app by its key alone. With no configuration the simulator is one app that
accepts any ``app-…`` key (or exactly ``--api-key``), says ``mode: advanced-chat`` in
``/info`` and plays the "chat" scenario unless ``inputs.tw_sim`` says otherwise: what every
test and ``tokenwire dev`` have always used. ``SimConfig(apps=…)`` or
``tokenwire simulate-dify --apps JSON`` serves several apps instead, key → fields of
``apps.AppSpec``::

    {"app-tickets": {"mode": "workflow", "name": "Tickets", "scenario": "human",
                     "suggested_questions_after_answer": true, "max_active_requests": 1}}

``mode`` is one of ``chat``, ``agent-chat``, ``advanced-chat`` (chatflow), ``agent`` (Dify's
newer Agent mode), ``completion``, ``workflow``. ``--apps demo`` is the built-in set:

=====================  ==============  ============================================
key                    mode            plays
=====================  ==============  ============================================
``app-simulator``      advanced-chat   the unconfigured simulator's app (any scenario)
``app-chat``           chat            message deltas, ``message_end``
``app-agent``          agent           ``agent_message`` deltas, one closing ``message``
``app-agent-chat``     agent-chat      agent thoughts, a tool file, ``agent_message``
``app-chatflow``       advanced-chat   workflow and node events around the answer
``app-chatflow-human`` advanced-chat   pauses at a Human Input node (``chatflow_human``)
``app-workflow``       workflow        an iteration, then ``text_chunk`` text
``app-completion``     completion      ``/completion-messages``
``app-human``          workflow        pauses at a Human Input node (``human``)
=====================  ==============  ============================================

Demo apps but ``app-simulator`` (``tokenwire dev``'s key, so ``dev`` keeps answering) have
every feature on: suggested questions, speech to text, text to speech.

Routes
------
Every app-key route of NOTES.md §8: chat, completion and workflow sends and stops,
``/workflows/run/{id}``, ``/workflows/logs``, ``/workflow/{id}/events``, human-input forms,
conversations (list, rename, delete, variables), messages (history, feedback, suggested),
files (upload, preview), audio (both ways), ``/info``, ``/parameters``, ``/meta``, ``/site``.
A route the app's mode does not serve answers Dify's ``not_chat_app``, ``not_workflow_app`` or
``app_unavailable`` (completion route).

Controls (``inputs.tw_sim``)
----------------------------
``scenario``, ``tokens``, ``delay_ms``, ``first_token_delay_ms``, ``ping_interval_s``,
``fault`` (refuse, 500, 429, 400, 413, error_event, cut, stall), ``cut_after``,
``fault_times``, and for workflows ``iterations`` and ``form_expiry_s`` (how long a human-input
form stays open). ``/_sim/requests`` (sends), ``/_sim/calls`` (everything else),
``/_sim/stops``, ``/_sim/apps`` (peak concurrency per app), ``/_sim/outage`` (sends only,
unless ``"calls": true``) and ``/_sim/faults`` (``{"path": "/v1/conversations", "fault":
"500", "times": 2}``, for any ``/v1`` path) are the test surface.
"""

from tokenwire.simulator.app import create_app
from tokenwire.simulator.apps import DEMO_APPS, AppSpec, parse_apps
from tokenwire.simulator.scenarios import (
    REPLACEMENT_TEXT,
    SimConfig,
    SimControls,
    answer_tokens,
    expected_answer,
    expected_final_answer,
    parse_controls,
)
from tokenwire.simulator.server import RunningSimulator, run, running, start_in_thread
from tokenwire.simulator.workflows import expected_workflow_answer, expected_workflow_outputs

__all__ = [
    "DEMO_APPS",
    "REPLACEMENT_TEXT",
    "AppSpec",
    "RunningSimulator",
    "SimConfig",
    "SimControls",
    "answer_tokens",
    "create_app",
    "expected_answer",
    "expected_final_answer",
    "expected_workflow_answer",
    "expected_workflow_outputs",
    "parse_apps",
    "parse_controls",
    "run",
    "running",
    "start_in_thread",
]
