"""Optional bridges to other tools. Nothing in the esh core imports these modules.

* ``esh.integrations.pu``: platonic-universe model adapters (``vim``, ``mambavision``,
  ``eshvision``), registered with ``pu.models.registry`` when imported (extra ``pu``).
"""
