# tessera_add_plugin(NAME SOURCES src.c... [LIBS target...])
#
# Builds a Tessera plugin: a MODULE library that exports only tessera_plugin_entry, linked
# against the SDK (Tessera::sdk: the ABI headers and <tessera/sdk.h>). The shipped plugins use
# this function in tree exactly as a third party uses it after find_package(Tessera).
function(tessera_add_plugin name)
  cmake_parse_arguments(P "" "" "SOURCES;LIBS" ${ARGN})
  add_library(${name} MODULE ${P_SOURCES})
  target_link_libraries(${name} PRIVATE Tessera::sdk ${P_LIBS})
  set_target_properties(${name} PROPERTIES
    PREFIX ""
    C_VISIBILITY_PRESET hidden
    C_STANDARD 11)
  if(DEFINED TESSERA_PLUGIN_BUILD_DIR)
    set_target_properties(${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${TESSERA_PLUGIN_BUILD_DIR})
  endif()
  if(DEFINED TESSERA_PLUGIN_INSTALL_DIR)
    install(TARGETS ${name} LIBRARY DESTINATION ${TESSERA_PLUGIN_INSTALL_DIR})
  endif()
endfunction()
