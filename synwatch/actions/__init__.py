"""Actions: what synwatch does about an incident, chosen per verdict (docs/actions.md).

Built-ins and plugins alike are classes registered under the entry-point group
``synwatch.actions.v1`` (see ``registry``). Each turns incident changes into ``Plan``s: the
rendered text of what it will do and a callable that does it, so dry-run can log the render and
stop there, and every outcome can be recorded on the incident.
"""
